"""mailauth: an SMTP submission server whose heart is SMTP AUTH."""
