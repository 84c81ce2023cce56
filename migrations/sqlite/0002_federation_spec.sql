-- The federation spec (fedee aggregator --spec): its TOML exactly as given and its SHA-256.
-- At most one row (id = 1); a federation's spec never changes once rounds have started.
CREATE TABLE federation_spec (
    id BIGINT PRIMARY KEY NOT NULL,
    sha256 TEXT NOT NULL,
    toml TEXT NOT NULL,
    stored_at BIGINT NOT NULL
);
