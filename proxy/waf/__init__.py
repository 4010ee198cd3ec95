"""The web application firewall: ModSecurity v3 through ctypes, and OpenAPI zero trust.

modsec.py     the ctypes binding for libmodsecurity3 (engine, rule sets, transactions)
rulesets.py   the rule sets of the sqli_xss and crs modes, per-route exclusions
findings.py   what a ModSecurity log line says: rule id, message, variable (redacted)
tuning.py     `stockade waf tune`: exclusions proposed from the recorded matches
body.py       the body as inspected: bounded, decompressed with a bomb limit
openapi.py    the zero-trust mode: requests checked against an OpenAPI 3 document
firewall.py   the per-worker WAF: modes per route, off-loop evaluation, counters
"""
