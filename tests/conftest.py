# The fixtures live in a module of their own, so that test modules import helpers from it rather
# than from a conftest (which pytest imports under its own rules).
pytest_plugins = ["tests.fixtures", "tests.scheduling"]
