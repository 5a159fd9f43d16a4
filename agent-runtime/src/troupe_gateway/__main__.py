"""STUB (issue 14): ``python -m troupe_gateway``; owned by helper G1."""


def main() -> None:
    raise SystemExit("troupe-gateway: not built yet")


if __name__ == "__main__":
    main()
