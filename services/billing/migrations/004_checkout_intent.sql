-- A checkout decides at its start which account its payment provisions: a new account (no account_id while the
-- token is open) or, for an authenticated checkout, the caller's own (account_id set at the start). The email a
-- stranger types never selects an account, so one account may come to have several Stripe customers (a renewal
-- after the old customer was removed in Stripe): account_id is no longer unique on customers.
-- Tables are unqualified: the migration runs with the billing schema first on the search path.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'customers'::regclass AND contype = 'u'
    LOOP
        EXECUTE format('ALTER TABLE customers DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
CREATE INDEX customers_account_idx ON customers (account_id);

-- Open checkouts expire (CHECKOUT_TOKEN_TTL_S): the sweep finds them by age.
CREATE INDEX checkout_tokens_open_created_idx ON checkout_tokens (created_at) WHERE status = 'open';
