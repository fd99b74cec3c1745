"""speechrt's small default English model: espeak-ng data, U2++ training, WeNet export."""
