"""Small apps the tests run in worker subprocesses (``tests.entities.apps.NAME:registry``)."""
