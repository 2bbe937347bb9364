"""What every app shares and that imports no app: validation of values that enter the
product (JSON, YAML). The rest of `config/` only wires settings, URLs and routing."""
