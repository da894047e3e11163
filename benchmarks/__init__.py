"""Long measurements (accuracy, speed, memory), run as ``python -m benchmarks.<script>``; see README.md here."""
