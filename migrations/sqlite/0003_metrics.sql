-- Metrics beyond accuracy (NULL when a site did not report them).
ALTER TABLE metrics ADD COLUMN balanced_accuracy DOUBLE PRECISION;
ALTER TABLE metrics ADD COLUMN macro_f1 DOUBLE PRECISION;
ALTER TABLE metrics ADD COLUMN auroc DOUBLE PRECISION;
