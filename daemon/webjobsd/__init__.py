"""webjobsd: hosts background jobs the way Kudu hosts Azure WebJobs, on Linux."""

__version__ = "0.1.0"
