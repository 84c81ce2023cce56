-- Federated preprocessing (spec `standardize = "federated"`): each site's noisy per-feature
-- statistics, sent once before round 1, as JSON [{feature, count, sum, sum_squares}]. The
-- sums served to the sites are those of the first `min_sites` rows by `seq`.
CREATE TABLE site_statistics (
    site TEXT PRIMARY KEY NOT NULL,
    seq BIGINT NOT NULL,
    features TEXT NOT NULL,
    stored_at BIGINT NOT NULL
);
