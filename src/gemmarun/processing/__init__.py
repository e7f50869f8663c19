"""Input preprocessing for the multimodal towers (images, video frames)."""
