"""What every stage runs on: the Accelerator and logging (``accelerator``), the one training loop
(``loop``), the run folder's paths (``layout``), one writer per run folder (``lock``) and the
command-line error policy (``command``)."""
