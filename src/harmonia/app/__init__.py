"""The application on top of the library: config, trainers, callbacks, benchmarks and the command line.

Nothing under ``harmonia`` outside this package imports it. It needs the ``train`` and ``data`` extras
(``pip install 'harmonia[all]'``); importing it without them says which package is missing.
"""

from harmonia.extras import check_installed

check_installed(
    ("yaml", "pydantic", "tqdm", "matplotlib", "tensorboard", "scipy", "sklearn"),
    "the harmonia application (trainer, config, command line)",
)
