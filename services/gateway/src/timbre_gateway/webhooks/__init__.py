"""Client webhooks: registrations, signed deliveries retried over the bus, and the SSRF guard on targets."""
