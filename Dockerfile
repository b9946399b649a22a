# One image for every role: `mtaq ingress`, `mtaq worker`, `mtaq queue`.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10025 --home-dir /var/lib/mtaq mtaq \
    && mkdir -p /var/lib/mtaq && chown mtaq /var/lib/mtaq
WORKDIR /opt/mtaq
COPY pyproject.toml README.md ./
COPY common ./common
COPY ingress ./ingress
COPY worker ./worker
RUN pip install --no-cache-dir .
USER mtaq
WORKDIR /var/lib/mtaq
EXPOSE 2525
ENTRYPOINT ["mtaq"]
CMD ["ingress"]
