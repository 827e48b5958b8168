"""fetch-data: download image datasets safely and resumably, unpack them, clean them and split them.

``registry`` (known datasets), ``download`` (resumable, verified HTTP), ``unpack`` (safe extraction),
``clean`` (drop what is not a whole image), ``layouts`` (class folders), ``request`` (what to fetch),
``archives`` (the download cache), ``build`` (the dataset folder) and ``dataset`` (``fetch``: the whole job).
A dataset is built in a hidden staging folder beside its destination and renamed into place only when
complete, so ``data/<name>`` is either absent or whole; ``data/<name>/dataset.json`` marks it done.
"""
