"""Security: sealed updates (HPKE), identities and signatures, TLS key tooling."""
