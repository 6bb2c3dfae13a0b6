"""Benchmarks of webjobsd, alone and against supervisord and PM2 (see bench/README.md)."""
