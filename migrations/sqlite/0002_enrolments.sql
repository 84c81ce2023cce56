-- Sites allowed to join: with mutual TLS, a site is the CN of its verified certificate and must
-- be enrolled here first (`fedee aggregator --enroll NAME`).
CREATE TABLE enrolments (
    name TEXT PRIMARY KEY NOT NULL,
    enrolled_at BIGINT NOT NULL
);
