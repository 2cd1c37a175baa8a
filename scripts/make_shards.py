"""Write webdataset shards from image folders (same as `pace-make-shards`; see `--help`)."""

from pace.data.make_shards import main

if __name__ == "__main__":
    main()
