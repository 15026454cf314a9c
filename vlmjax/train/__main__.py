"""``python -m vlmjax.train``."""

from vlmjax.train.command import main

main()
