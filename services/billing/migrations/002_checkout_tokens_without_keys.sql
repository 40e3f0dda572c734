-- The gateway mints the checkout's API key and holds its plaintext (gateway.checkout_keys); billing only
-- says whether a checkout is paid. Drop the key column and the statuses and times that only served it.
-- Tables are unqualified: the migration runs with the billing schema first on the search path.

-- 001's checks are unnamed (one on status, one tying api_key to status): drop every check on the table
-- by its catalog name rather than guess the generated names.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'checkout_tokens'::regclass AND contype = 'c'
    LOOP
        EXECUTE format('ALTER TABLE checkout_tokens DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;

ALTER TABLE checkout_tokens
    DROP COLUMN api_key,
    DROP COLUMN ready_at,
    DROP COLUMN delivered_at;

-- A token that reached ready/delivered/expired was paid; say so before the narrower check applies.
UPDATE checkout_tokens SET status = 'paid' WHERE status IN ('ready', 'delivered', 'expired');

ALTER TABLE checkout_tokens
    ADD CONSTRAINT checkout_tokens_status_check CHECK (status IN ('open', 'paid'));
