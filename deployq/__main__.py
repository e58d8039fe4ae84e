"""``python -m deployq``: the deployq command line."""

from deployq._entry import main

main()
