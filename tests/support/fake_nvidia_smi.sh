#!/bin/sh
# A fake nvidia-smi for the curator's tests: prints what a test put in STATE_DIR,
# which the tests fill from the real H100 captures in tests/fixtures/nvidia-h100/.
#
#   fake_nvidia_smi.sh STATE_DIR --query-gpu=... --format=...           -> STATE_DIR/query.csv
#   fake_nvidia_smi.sh STATE_DIR --query-compute-apps=... --format=...  -> STATE_DIR/apps.csv
#
# As the real tool: no query.csv means no GPU ("No devices were found", exit 6); a
# file STATE_DIR/driver-gone makes it fail as it does when the driver is gone (exit 9).
dir=$1
shift
case " $* " in
  *" --query-gpu="*) file=query.csv ;;
  *" --query-compute-apps="*) file=apps.csv ;;
  *) echo "fake nvidia-smi: only --query-gpu and --query-compute-apps" >&2; exit 2 ;;
esac
if [ -e "$dir/driver-gone" ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
  exit 9
fi
if [ "$file" = query.csv ] && [ ! -s "$dir/query.csv" ]; then
  echo "No devices were found"
  exit 6
fi
[ -e "$dir/$file" ] && cat "$dir/$file"
exit 0
