"""Object-aware search over your own photos: detector boxes, a persistent index, search and a web page."""
