"""The FUSE daemon: operations, chunk cache, mount lifecycle, service integration."""
