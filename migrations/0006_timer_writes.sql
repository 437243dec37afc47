-- Timers are re-armed for every user a round evaluates, so their writes are on the hot path.
-- The foreign key to contacts cost a lookup and a row lock per written timer; erasure now
-- deletes a user's timers itself (`Store::erase_user`), in the transaction that deletes the
-- contact, and `timers_user` serves that delete.
ALTER TABLE timers DROP CONSTRAINT timers_user_id_fkey;
