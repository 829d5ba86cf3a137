"""The one error type of a rollout job (`python -m atom.rollout` prints it as `error: ...`)."""


class JobError(Exception):
    """A problem with the job's config, input or output, reported as one line (`error: ...`)."""
