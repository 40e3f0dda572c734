-- Billing owns Stripe customers, subscriptions, the Stripe event log and the usage ledger.
-- Tables are unqualified: the pool's search_path selects the billing schema.

CREATE TABLE customers (
    customer_id  text PRIMARY KEY,                 -- Stripe cus_...
    email        text NOT NULL,                    -- lower-cased
    account_id   text UNIQUE,                      -- the gateway's account, set once provisioned
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_email_idx ON customers (email);

-- One row per checkout attempt. api_key holds the minted key's plaintext only between the gateway
-- provisioning it and the first read of the success page; that read nulls it in the same statement.
CREATE TABLE checkout_tokens (
    token         text PRIMARY KEY,
    email         text NOT NULL,
    session_id    text UNIQUE,
    status        text NOT NULL DEFAULT 'open'
                  CHECK (status IN ('open', 'paid', 'ready', 'delivered', 'expired')),
    customer_id   text,
    account_id    text,
    api_key       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    paid_at       timestamptz,
    ready_at      timestamptz,
    delivered_at  timestamptz,
    CHECK (api_key IS NULL OR status = 'ready')
);

CREATE TABLE subscriptions (
    subscription_id       text PRIMARY KEY,       -- Stripe sub_...
    customer_id           text NOT NULL,          -- no FK: subscription events may precede checkout
    status                text NOT NULL,
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    last_event_created    bigint NOT NULL DEFAULT 0,   -- Stripe event `created` of the last applied event
    canceled_at           timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_customer_idx ON subscriptions (customer_id);

-- Apply-once log: the insert of the event id is the guard, in the same transaction as its effects.
CREATE TABLE stripe_events (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    created      bigint NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL DEFAULT 'pending',     -- applied | stale | ignored
    actions      jsonb NOT NULL DEFAULT '{}'::jsonb    -- what the event asked of others, to re-emit on redelivery
);

-- Characters per finished job, once per job however often job.ready arrives.
CREATE TABLE usage_ledger (
    job_id        text PRIMARY KEY,
    account_id    text NOT NULL,
    characters    integer NOT NULL CHECK (characters >= 0),
    occurred_at   timestamptz NOT NULL,
    period_start  timestamptz NOT NULL,               -- the period the job was counted in when recorded
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_account_time_idx ON usage_ledger (account_id, occurred_at);
