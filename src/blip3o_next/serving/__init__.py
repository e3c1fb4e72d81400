"""Serving: the web demo and HTTP JSON API (`blip3o serve`)."""
