"""What a network has learned: ideal images, feature maps, adversarial examples."""
