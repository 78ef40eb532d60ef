"""Ray Serve shells around internvl_core; plain classes decorated in app.py."""
