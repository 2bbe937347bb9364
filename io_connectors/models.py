"""IO profiles (io_config.yaml) and connectors arrive with the IO issue."""
