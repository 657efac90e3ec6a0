"""Exploration: forking a process at kernel choices (``explorer``) and splitting the work over
worker processes or Ray tasks (``parallel``)."""
