"""What every app shares and that imports no app: the API's envelopes, pagination and
error answers (`api`), roles and the Bearer token (`permissions`), settings read from the
environment (`env`), and validation of values that enter the product (`jsonsafe`,
`limits`, `safe_yaml`). The rest of `config/` only wires settings, URLs and routing."""
