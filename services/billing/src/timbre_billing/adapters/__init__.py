"""Billing I/O: PostgreSQL repository, Stripe API gateway, webhook signature verification."""
