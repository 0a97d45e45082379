"""The application on top of the library: config, trainers, callbacks, benchmarks and the command line.

Nothing under ``harmonia`` outside this package imports it."""
