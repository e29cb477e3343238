-- Event streams (`GET /jobs/{id}/events`) wait on one LISTEN connection per
-- process instead of polling. Every writer of what a stream shows (status,
-- attempt, finished epoch, in-epoch progress) goes through this trigger, in
-- whichever process it runs; the payload is the job id only, and a woken
-- stream reads the job itself. Sent at commit, so the new state is visible.
CREATE FUNCTION notify_job_event() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('finetuned_job_events', NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify_event
    AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.attempts IS DISTINCT FROM NEW.attempts
          OR OLD.epoch IS DISTINCT FROM NEW.epoch
          OR OLD.progress IS DISTINCT FROM NEW.progress)
    EXECUTE FUNCTION notify_job_event();
