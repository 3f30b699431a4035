"""Serving predictions: the hosted models and their hot swap, MQTT serving, shadow comparison, prediction summaries."""
