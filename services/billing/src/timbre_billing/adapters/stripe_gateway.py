"""The Stripe API through the official SDK's async methods (httpx), pointed at a fake with STRIPE_API_BASE."""
from __future__ import annotations

from typing import Any

import stripe

from ..domain import SERVED_STATUSES, SubscriptionSnapshot, subscription_from_stripe
from ..settings import BillingSettings


class StripeUnavailable(Exception):
    """Stripe could not be reached or failed; the caller retries later."""


class StripeGateway:
    """Checkout Sessions and subscriptions for the one plan price."""

    def __init__(
        self, api_key: str, *, price_id: str, api_base: str | None = None, max_network_retries: int = 2
    ) -> None:
        self._http = stripe.HTTPXClient(timeout=20)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self._http,
            max_network_retries=max_network_retries,
        )
        self._price_id = price_id

    @classmethod
    def from_settings(cls, settings: BillingSettings) -> StripeGateway:
        """A gateway configured from billing settings."""
        return cls(
            settings.stripe_secret_key.get_secret_value(),
            price_id=settings.stripe_price_id,
            api_base=settings.stripe_api_base,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.close_async()

    async def create_checkout_session(
        self,
        customer_email: str,
        token: str,
        success_url: str,
        cancel_url: str,
        *,
        customer_id: str | None = None,
        expires_at: int | None = None,
    ) -> tuple[str, str]:
        """Create a subscription Checkout Session tagged with `token`; returns (session id, url)."""
        params: dict[str, Any] = {
            "mode": "subscription",
            "line_items": [{"price": self._price_id, "quantity": 1}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": token,
            "metadata": {"checkout_token": token},
        }
        if expires_at is not None:
            params["expires_at"] = expires_at
        # Stripe accepts one of the two. Only an authenticated checkout names a customer (its own account's);
        # with an email Stripe makes a new Customer, so a typed address never reaches anyone's account.
        if customer_id:
            params["customer"] = customer_id
        else:
            params["customer_email"] = customer_email
        try:
            session = await self._client.v1.checkout.sessions.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": f"checkout-{token}"},
            )
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"checkout session: {type(exc).__name__}") from exc
        if not session.url:
            raise StripeUnavailable("checkout session without url")
        return session.id, session.url

    async def retrieve_subscription(self, subscription_id: str) -> SubscriptionSnapshot:
        """The subscription as Stripe holds it now."""
        try:
            sub = await self._client.v1.subscriptions.retrieve_async(subscription_id)
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"retrieve subscription: {type(exc).__name__}") from exc
        return subscription_from_stripe(sub)

    async def find_active_subscription(self, customer_id: str) -> SubscriptionSnapshot | None:
        """A served (active, trialing, past_due) subscription of this Stripe customer."""
        try:
            subs = await self._client.v1.subscriptions.list_async(
                {"customer": customer_id, "status": "all", "limit": 20}
            )
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"find subscription: {type(exc).__name__}") from exc
        for sub in subs.data:
            if sub.status in SERVED_STATUSES:
                return subscription_from_stripe(sub)
        return None
