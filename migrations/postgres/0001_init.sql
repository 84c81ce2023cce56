-- fedee aggregator state (PostgreSQL). Times are integer Unix epochs (seconds unless named _ms).
-- Keep in step with migrations/sqlite: the same queries run on both (sqlx Any).
-- Sites that joined (with mutual TLS: their certificate's name).
CREATE TABLE sites (
    name TEXT PRIMARY KEY NOT NULL,
    joined_at BIGINT NOT NULL
);

-- Sites allowed to join: with mutual TLS, a site is the CN of its verified certificate and must
-- be enrolled here first (`fedee aggregator --enroll NAME`).
CREATE TABLE enrolments (
    name TEXT PRIMARY KEY NOT NULL,
    enrolled_at BIGINT NOT NULL
);

-- Global models: model k is the model round k trains from (model 1 = initial model). The bytes
-- live in the content-addressed blob store (--blob-dir), named by sha256.
CREATE TABLE models (
    model BIGINT PRIMARY KEY NOT NULL,
    sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- FedAdam / FedYogi moments after producing this model (blob), NULL for other strategies.
    server_state_sha256 TEXT
);

-- Rounds: state is 'open', 'closed' (aggregated) or 'failed' (quorum not met by the deadline;
-- the next round starts from the same global model). deadline_ms is NULL until the quorum of
-- sites has joined (round 1) and is a Unix epoch in milliseconds.
CREATE TABLE rounds (
    round BIGINT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    opened_at BIGINT NOT NULL,
    deadline_ms BIGINT,
    closed_at BIGINT,
    rho DOUBLE PRECISION,
    epsilon DOUBLE PRECISION,
    reason TEXT
);

-- Accepted updates: the blob is written and fsynced, then this row committed, then the site
-- gets its acknowledgement.
CREATE TABLE updates (
    round BIGINT NOT NULL,
    site TEXT NOT NULL,
    num_examples BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (round, site)
);

-- Sites' evaluations of global models on their own test splits.
CREATE TABLE metrics (
    model BIGINT NOT NULL,
    site TEXT NOT NULL,
    test_accuracy DOUBLE PRECISION NOT NULL,
    num_test_examples BIGINT NOT NULL,
    PRIMARY KEY (model, site)
);

-- Rejected updates, with the reason (audit trail).
CREATE TABLE rejections (
    id BIGSERIAL PRIMARY KEY,
    round BIGINT,
    site TEXT,
    reason TEXT NOT NULL,
    at BIGINT NOT NULL
);

-- Sites' privacy ledgers as reported with their updates: one row per site and round.
CREATE TABLE privacy_ledger (
    site TEXT NOT NULL,
    round BIGINT NOT NULL,
    unit TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    sampling_rate DOUBLE PRECISION NOT NULL,
    noise_multiplier DOUBLE PRECISION NOT NULL,
    steps BIGINT NOT NULL,
    epsilon DOUBLE PRECISION NOT NULL,
    delta DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (site, round)
);

-- Sites that left the federation for good (e.g. privacy budget spent), with the reason.
CREATE TABLE departures (
    site TEXT PRIMARY KEY NOT NULL,
    reason TEXT NOT NULL,
    at BIGINT NOT NULL
);
