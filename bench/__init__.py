"""Side-by-side benchmarks of objfs against s3fs-fuse, rclone mount and direct boto3 (``python -m bench``)."""
