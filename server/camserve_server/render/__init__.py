"""Pixels in and out: decoding and resizing request images, rendering heatmaps and overlays."""
