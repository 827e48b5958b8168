"""Images in: datasets fetched and scanned, photos decoded, resized and split into views."""
