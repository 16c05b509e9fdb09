"""Configuration: the config's shape, loading it with located errors, and TLS material."""
