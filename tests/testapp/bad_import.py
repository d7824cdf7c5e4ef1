"""A module that imports something that does not exist."""
import sisy_no_such_dependency  # noqa: F401
