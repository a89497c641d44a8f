"""Key material: JWK parsing and the providers that find keys by kid."""
