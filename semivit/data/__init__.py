"""Images and labels: data sets as sources (``sources``), the labeled split (``split``, and
``run_split`` for the run's one split file), and the weak/strong views (``views``)."""
