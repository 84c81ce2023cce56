-- Validation-split accuracy per site and global model: the federation selects its model on
-- it (NULL and 0 when a site has no validation split or predates this column).
ALTER TABLE metrics ADD COLUMN validation_accuracy DOUBLE PRECISION;
ALTER TABLE metrics ADD COLUMN num_validation_examples BIGINT NOT NULL DEFAULT 0;
