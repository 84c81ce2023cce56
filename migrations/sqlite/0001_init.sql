-- fedee aggregator state (SQLite). Times are integer Unix epochs (seconds).
CREATE TABLE sites (
    name TEXT PRIMARY KEY NOT NULL,
    joined_at BIGINT NOT NULL
);

-- Global models: model k is the model round k trains from (model 1 = initial model).
CREATE TABLE models (
    model BIGINT PRIMARY KEY NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BLOB NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE rounds (
    round BIGINT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    opened_at BIGINT NOT NULL,
    closed_at BIGINT,
    rho DOUBLE PRECISION,
    epsilon DOUBLE PRECISION
);

-- Accepted updates: persisted before they are acknowledged.
CREATE TABLE updates (
    round BIGINT NOT NULL,
    site TEXT NOT NULL,
    num_examples BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BLOB NOT NULL,
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
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round BIGINT,
    site TEXT,
    reason TEXT NOT NULL,
    at BIGINT NOT NULL
);
