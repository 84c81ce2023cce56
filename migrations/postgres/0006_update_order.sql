-- The order in which a round's updates were accepted (1, 2, ...): the aggregator folds them
-- into the round's running sum in this order, and again in this order after a restart, so the
-- global model's bits do not depend on a crash. NULL for rows from before this column.
ALTER TABLE updates ADD COLUMN seq BIGINT;
