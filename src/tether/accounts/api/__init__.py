"""The accounts app's human API: API tokens, mounted at /api/ (tether.urls)."""
