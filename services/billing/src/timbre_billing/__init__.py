"""Billing: Stripe Checkout and webhooks, character usage per billing period, quota answers."""
